"""workflow-bff: a backend-for-frontend for the AI Tutor workflow API."""

__version__ = "0.1.0"
