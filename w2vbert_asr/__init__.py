"""w2vbert-asr: fine-tune W2v-BERT 2.0 into a CTC recogniser for a low-resource language."""

__version__ = "0.1.0"


class UsageError(RuntimeError):
    """A problem the user can fix (bad path, empty split, unknown language): printed without a traceback."""
