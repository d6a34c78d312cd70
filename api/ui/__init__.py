"""The HTML dashboard's pieces apart from its routes (``api/routes/dashboard.py``): Jinja
set-up, the SVG bar chart, and the pages' view models."""
