"""The bytes a terminal sends for keys, read as the actions of ``shmstore top``.

A terminal sends a letter as its byte and most other keys as an escape sequence, which
must be skipped whole: F2 is ``ESC O Q`` and Shift-F2 ``ESC O 1;2 Q`` (or ``ESC [ 1;2 Q``),
none of which is ``q``. A sequence may arrive split across two reads; a paste (the
terminal brackets it between ``ESC [200~`` and ``ESC [201~`` once top asks for it) is text,
not keys. Pure: no terminal here, only bytes in and actions out.
"""

from __future__ import annotations

#: The keys ``top`` reads, as the bytes a terminal sends for them (the cursor keys in both
#: of its modes, normal and application), and what each does.
KEYS = {
    b"\x1b[A": "up",
    b"\x1bOA": "up",
    b"k": "up",
    b"\x1b[B": "down",
    b"\x1bOB": "down",
    b"j": "down",
    b"\r": "go",
    b"\n": "go",
    b"g": "go",
    b"q": "quit",
    b"Q": "quit",
}
#: Seconds to wait for the rest of an escape sequence whose start ended a read, before
#: taking it for the Esc key alone (which does nothing). A terminal writes a sequence in
#: one go; ncurses waits 1 s by default (ESCDELAY), far more than any local terminal needs.
REST_OF_SEQUENCE = 0.05

ESC = 0x1B
PASTE_START = b"\x1b[200~"
PASTE_END = b"\x1b[201~"


class Keyboard:
    """Bytes read from the terminal in, actions out (see :data:`KEYS`), in order. It keeps
    what a read ended in the middle of: an escape sequence's start (``holding``), or a
    paste not yet ended."""

    def __init__(self) -> None:
        self._held = b""
        self._pasting = False

    @property
    def holding(self) -> bool:
        """Whether the last read ended inside an escape sequence (not a paste's end marker:
        that is kept, however long the rest takes)."""
        return bool(self._held) and not self._pasting

    def drop(self) -> None:
        """The rest did not come: what was held was the Esc key, which does nothing."""
        self._held = b""

    def feed(self, typed: bytes) -> list[str]:
        """The actions of ``typed``, after what the previous read left held."""
        data, at, actions = self._held + typed, 0, []
        self._held = b""
        while at < len(data):
            if self._pasting:
                at = self._skip_paste(data, at)
                continue
            size = key_size(data, at)
            if size is None:
                self._held = data[at:]
                break
            key = data[at : at + size]
            if key == PASTE_START:
                self._pasting = True
            elif (action := KEYS.get(key)) is not None:
                actions.append(action)
            at += size
        return actions

    def _skip_paste(self, data: bytes, at: int) -> int:
        """Past the paste's end, or to the end of ``data`` (holding what may be the start of
        the end marker)."""
        end = data.find(PASTE_END, at)
        if end >= 0:
            self._pasting = False
            return end + len(PASTE_END)
        for size in range(len(PASTE_END) - 1, 0, -1):
            if data.endswith(PASTE_END[:size]):
                self._held = data[-size:]
                break
        return len(data)


def key_size(data: bytes, at: int) -> int | None:
    """How many bytes the key starting at ``at`` sent, or None when ``data`` ends before the
    key does. ESC ``[`` or ESC ``O``, parameter and intermediate bytes (0x20 to 0x3F), then
    a final byte (ECMA-48's control sequences and SS3, whose modified forms some terminals
    send); ESC and one more (Alt and a key); any other byte alone."""
    if data[at] != ESC:
        return 1
    if at + 1 == len(data):
        return None
    if data[at + 1] not in b"[O":
        return 2
    end = at + 2
    while end < len(data) and 0x20 <= data[end] <= 0x3F:
        end += 1
    if end == len(data):
        return None
    if not 0x40 <= data[end] <= 0x7E:  # not a sequence after all: skip its start only
        return end - at
    return end + 1 - at


def pressed(typed: bytes) -> list[str]:
    """The actions of one read on its own (what a split sequence leaves is dropped)."""
    return Keyboard().feed(typed)
