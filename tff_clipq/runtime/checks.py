"""Argument checks of `tff_clipq.runtime`: integers, positive numbers, `host:port` addresses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


def check_int(value: object, name: str, minimum: Optional[int] = None) -> None:
  """Raises ValueError unless `value` is an int (not a bool), and >= `minimum` if one is given.

  Args:
    value: the value to check.
    name: the argument's name, used in the error message.
    minimum: optional inclusive lower bound; None means no bound.

  Raises:
    ValueError: if `value` is not such an integer.
  """
  if (
    isinstance(value, bool)
    or not isinstance(value, int)
    or (minimum is not None and value < minimum)
  ):
    bound = f' >= {minimum}' if minimum is not None else ''
    raise ValueError(f'`{name}` should be an integer{bound}. Found {value!r}.')


def check_intra_op_threads(value: object) -> None:
  if value is not None:
    check_int(value, 'intra_op_threads', minimum=1)


def check_positive(value: object, name: str, allow_none: bool = False) -> None:
  """Raises ValueError unless `value` is an int or float (not a bool) greater than zero.

  Args:
    value: the value to check.
    name: the argument's name, used in the error message.
    allow_none: whether None is accepted as well.

  Raises:
    ValueError: if `value` is not a positive number (or None, when `allow_none` is set).
  """
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f'`{name}` should be a positive number. Found {value!r}.')


def _check_address(address: object, index: int) -> str:
  """Returns `address` if it is `host:port` (IPv6 hosts in brackets), else raises ValueError."""
  error = ValueError(
    f'`worker_addresses[{index}]` should be "host:port" with an integer port in 1..65535. '
    f'Found {address!r}.'
  )
  if not isinstance(address, str) or any(c.isspace() for c in address):
    raise error
  host, separator, port = address.rpartition(':')
  if not separator or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise error
  if host.startswith('['):
    if not host.endswith(']') or len(host) == 2:
      raise error
  elif ':' in host or ']' in host:  # IPv6 without brackets, or stray bracket.
    raise error
  return address


def check_addresses(worker_addresses: object) -> list[str]:
  if isinstance(worker_addresses, (str, bytes)) or not isinstance(worker_addresses, Sequence):
    raise ValueError(
      f'`worker_addresses` should be a sequence of "host:port" strings. Found {worker_addresses!r}.'
    )
  if not worker_addresses:
    raise ValueError('`worker_addresses` should name at least one worker. Found [].')
  return [_check_address(a, i) for i, a in enumerate(worker_addresses)]
