"""Thin HTTP handlers, one module per API family. No model code here."""
