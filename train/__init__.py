"""Training code (Lightning): RECIPE's retriever, prompt encoder and sentinel. Not part of the library."""
