"""Realtime Authorization fixtures: a migrated database of the test's own
with policies written as in Supabase's documentation, and two users."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.mother import fresh_database

ALICE, BOB = str(uuid.uuid4()), str(uuid.uuid4())

POLICIES = """
create table public.rooms_users (user_id uuid not null, room_topic text not null);
grant select on public.rooms_users to authenticated, anon;

-- Anyone signed in may receive on room:* topics (both extensions).
create policy "authenticated read rooms" on realtime.messages
  for select to authenticated using (realtime.topic() like 'room:%');
-- Only members of a room (an app table) may send broadcasts there.
create policy "members send" on realtime.messages
  for insert to authenticated with check (
    realtime.messages.extension = 'broadcast'
    and exists (
      select 1 from public.rooms_users
      where user_id = auth.uid() and room_topic = realtime.topic()
    )
  );
-- acme.com addresses may read the staff topic (a policy on the claims).
create policy "acme staff read" on realtime.messages
  for select to authenticated using (
    realtime.topic() = 'staff'
    and (current_setting('request.jwt.claims', true)::json ->> 'email') like '%@acme.com'
  );
-- The lobby: presence may be read by anyone signed in, never written.
create policy "lobby presence read" on realtime.messages
  for select to authenticated using (
    realtime.topic() = 'lobby' and realtime.messages.extension = 'presence'
  );
"""


@pytest.fixture
async def policies_dsn() -> AsyncIterator[str]:
    async with fresh_database() as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(POLICIES)
            await conn.execute(
                "insert into public.rooms_users values ($1, 'room:a')", uuid.UUID(ALICE)
            )
        finally:
            await conn.close()
        yield url
