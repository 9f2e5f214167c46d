"""A small terminal model for the live region's resize tests: rows of cells, a cursor, the
control sequences rich emits (CR, LF, cursor up, erase line, SGR and cursor visibility),
characters two cells wide as terminals place them,
and a resize that either re-wraps lines as tmux, VTE or iTerm2 do (`reflow=True`) or cuts
them as xterm does; some re-wrapping terminals also drop trailing blanks (`trims`).
Rows are never dropped (the scrollback is unbounded), so a test reads everything ever
left on screen."""

from __future__ import annotations

import re
import unicodedata

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
WIDE = ""  # the cell a two-cell character covers after its own


def _cells(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class Terminal:
    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.rows: list[list[str]] = [[]]
        self.wrapped: list[bool] = [False]  # row i continues on row i + 1 (a soft wrap)
        self.row = 0
        self.col = 0

    def write(self, data: str) -> None:
        i = 0
        while i < len(data):
            m = _CSI.match(data, i)
            if m:
                self._csi(m.group(1), m.group(2))
                i = m.end()
                continue
            ch = data[i]
            i += 1
            if ch == "\r":
                self.col = 0
            elif ch == "\n":  # the tty's onlcr: CR LF
                self.col = 0
                self._down()
            elif ch >= " ":
                self._put(ch)

    def _csi(self, params: str, command: str) -> None:
        if command == "A":
            self.row = max(0, self.row - int(params or 1))
            self.col = min(self.col, self.columns - 1)
        elif command == "K" and params == "2":
            self.rows[self.row] = []

    def _down(self) -> None:
        self.row += 1
        if self.row == len(self.rows):
            self.rows.append([])
            self.wrapped.append(False)

    def _put(self, ch: str) -> None:
        width = _cells(ch)
        if self.col + width > self.columns:  # the pending wrap (a wide character that does not fit wraps too)
            line = self.rows[self.row]
            line.extend(" " * (self.col - len(line)))
            line[self.col :] = [WIDE] * (self.columns - self.col)  # the cell it left empty: no text
            self.wrapped[self.row] = True
            self.col = 0
            self._down()
        line = self.rows[self.row]
        line.extend(" " * (self.col + width - len(line)))
        line[self.col : self.col + width] = [ch] + [WIDE] * (width - 1)
        self.col += width

    def resize(self, columns: int, reflow: bool, trims: bool = False) -> None:
        """`trims`: the terminal drops a line's trailing blanks when it re-wraps it."""
        if not reflow:  # each row keeps its place, cut at the new width
            self.rows = [r[:columns] for r in self.rows]
            self.columns, self.col = columns, min(self.col, columns)
            return
        # Join soft-wrapped rows into lines, find the cursor in its line, and wrap again.
        lines: list[list[str]] = []
        cursor = (0, 0)
        current: list[str] = []
        for i, row in enumerate(self.rows):
            if i == self.row:
                cursor = (len(lines), len(current) + self.col)
            current += row + [" "] * (self.columns - len(row)) if self.wrapped[i] else row
            if not self.wrapped[i]:
                keep = len("".join(current).rstrip(" ")) if trims else len(current)
                lines.append(current[: max(keep, cursor[1] if cursor[0] == len(lines) else 0)])
                current = []
        if current:
            lines.append(current)
        self.columns = columns
        self.rows, self.wrapped = [], []
        for n, line in enumerate(lines):
            chunks: list[list[str]] = [[]]
            at = (0, 0)  # the cursor's row and column in these chunks
            for k, cell in enumerate(line):
                if n == cursor[0] and k == cursor[1]:
                    at = (len(chunks) - 1, len(chunks[-1]))
                if cell == WIDE:
                    continue
                width = _cells(cell)
                if len(chunks[-1]) + width > columns:  # a wide character is never split
                    chunks.append([])
                chunks[-1] += [cell] + [WIDE] * (width - 1)
            if n == cursor[0]:
                at = at if cursor[1] < len(line) else (len(chunks) - 1, len(chunks[-1]))
                self.row, self.col = len(self.rows) + at[0], at[1]
            self.rows += chunks
            self.wrapped += [True] * (len(chunks) - 1) + [False]

    def text(self) -> list[str]:
        return ["".join(c for c in r if c != WIDE).rstrip() for r in self.rows]
