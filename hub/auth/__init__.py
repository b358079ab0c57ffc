"""Authentication (Supabase JWTs) and authorization (who may use which topic)."""
