"""k4serve: a serving engine for Kandinsky 4.0 T2V Flash."""
