"""hub: a multi-tenant realtime hub that speaks the Supabase Realtime protocol."""

__version__ = "0.1.0"
