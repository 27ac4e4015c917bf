"""cdfkd package."""
