"""Paper reproduction (``taskvec benchmark``): the negation, addition and analogy experiments. Not part of the core library."""
