from tests.rag.conftest import encoder  # noqa: F401  (the real all-MiniLM-L6-v2 encoder)
