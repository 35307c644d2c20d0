"""Selecting rows by the ids or names a user typed (``--images 3 mic_0007``)."""

from __future__ import annotations

from collections.abc import Sequence


def by_id_or_name(selection: Sequence[str | int] | None, alias: str = "") -> tuple[str, list]:
    """The WHERE condition (without ``WHERE``) matching ``selection`` by id or name, and its arguments.

    Words that are all digits are ids, the others names; an empty or missing
    selection matches every row (``"1"``).

    Parameters
    ----------
    selection : sequence of str or int, optional
        What the user typed.
    alias : str
        Table alias of the ``id`` and ``name`` columns (``"i"`` for ``i.id``).

    Returns
    -------
    (str, list)
        SQL condition and its parameters.

    >>> by_id_or_name(["3", "mic_7"], "i")
    ('(i.id IN (?) OR i.name IN (?))', [3, 'mic_7'])
    >>> by_id_or_name(None)
    ('1', [])
    """
    if not selection:
        return "1", []
    prefix = f"{alias}." if alias else ""
    ids = [int(s) for s in selection if str(s).isdigit()]
    names = [str(s) for s in selection if not str(s).isdigit()]
    parts, args = [], []
    if ids:
        parts.append(f"{prefix}id IN ({','.join('?' * len(ids))})")
        args += ids
    if names:
        parts.append(f"{prefix}name IN ({','.join('?' * len(names))})")
        args += names
    return "(" + " OR ".join(parts) + ")", args
