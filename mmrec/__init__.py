"""mmrec."""
