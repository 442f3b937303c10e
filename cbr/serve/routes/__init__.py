"""One APIRouter per resource: health, queries, cases, the browser pages and the compare view."""

__all__ = ["health", "queries", "cases", "pages", "compare"]
