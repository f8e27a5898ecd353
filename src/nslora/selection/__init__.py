"""Choosing samples for symbolic updates: the per-sample criteria (`criteria`) and asking the student
(`student`) whether it gets the chosen ones right."""
