"""Monte Carlo dropout inside other frameworks' inference loops (each module needs its framework's extra)."""
