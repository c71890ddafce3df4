"""The curation console: a static web page served by the API under /console."""
