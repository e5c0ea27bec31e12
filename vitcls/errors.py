"""Errors that are the user's to fix: the CLIs print their message as one line."""


class UserError(ValueError):
  """A mistake in a config, a command line or the data; the message says the fix."""


def shown(text) -> str:
  """`text` quoted for a one-line message: 'as typed', or escaped (repr) if it holds
  newlines or other unprintable characters, so an error never spans lines."""
  text = str(text)
  return f"'{text}'" if text.isprintable() else repr(text)
