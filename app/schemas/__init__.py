"""Pydantic schemas of the JSON API and the HTML forms, one module per area, kept apart
from the table models; the functions that turn rows into these shapes live beside them."""
