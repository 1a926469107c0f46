"""Rendering: results -> report.html (jinja2), results.json, junit.xml. Imports checks/ for result types only."""
