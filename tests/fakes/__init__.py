"""In-process test doubles of the layers below the code under test (see fault_store.py)."""
