"""argparse help that shows every option's default once, for each ``poolguard`` command."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" unless the help text already says its default in words.

    Flags (default False) and options without a default say nothing: their help must.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag_or_unset = action.default is None or action.default is False
        if "(default" in text or flag_or_unset or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text
