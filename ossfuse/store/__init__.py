"""Object stores: a small async interface (``base``) and its implementations."""
