"""magface-al: score face pairs with MagFace, learn from pair feedback, measure the effect."""

__version__ = "0.1.0"
