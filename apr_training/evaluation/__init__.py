"""Evaluation: one frame runner over label-CSV and bag sources, metrics, reports, plots, live replay."""
