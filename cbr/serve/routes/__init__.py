"""One APIRouter per resource: health, queries, cases, and the browser pages."""

__all__ = ["health", "queries", "cases", "pages"]
