"""Command-line option groups that several commands share (one definition, one help text)."""

from __future__ import annotations

import argparse

__all__ = ["add_contrast_arguments"]


def add_contrast_arguments(p: argparse.ArgumentParser) -> None:
    """``--protein-is-white`` / ``--protein-is-dark``: the contrast of a particle stack.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The command's parser; the choice lands in ``protein_is_white`` (None when neither is given).

    >>> p = argparse.ArgumentParser(); add_contrast_arguments(p)
    >>> p.parse_args(["--protein-is-dark"]).protein_is_white, p.parse_args([]).protein_is_white
    (False, None)
    """
    g = p.add_mutually_exclusive_group()
    g.add_argument("--protein-is-white", dest="protein_is_white", action="store_const", const=True,
                   help="the stack has protein white (RELION's convention; the default with RELION .star "
                        "parameters): images are inverted when read")
    g.add_argument("--protein-is-dark", dest="protein_is_white", action="store_const", const=False,
                   help="the stack has protein dark (cisTEM's convention; the default with .par, cisTEM .star, .cs)")
