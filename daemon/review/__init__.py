"""Technician review web app."""
