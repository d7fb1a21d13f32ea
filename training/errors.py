"""The error the training glue raises for a bad node input."""


class InputError(ValueError):
    """`input` names the node input at fault; the message says what is wrong and the fix."""

    def __init__(self, input_name: str, message: str):
        super().__init__(message)
        self.input = input_name
