"""Errors that are the user's to fix: the CLIs print their message as one line."""


class UserError(ValueError):
  """A mistake in a config, a command line or the data; the message says the fix."""
