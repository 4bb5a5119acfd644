"""What every payload format shares: QEMU's limit, "no state", the formats,
and the one decoded type every reader fills."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..model import Entry

#: QEMU's limit for one helper's state, inclusive (``DBUS_VMSTATE_SIZE_LIMIT``).
MAX_PAYLOAD = 1 << 20
#: What Save returns when there is nothing to send: QEMU refuses an empty
#: array, and the Perl helper treats a payload of at most one byte as nothing.
NO_STATE = b"\x00"
#: How many refused lines or records a decoded payload keeps for the log (all are counted).
MAX_REFUSAL_SAMPLES = 20


class Format(enum.StrEnum):
    """What a payload is (Load tells them apart by their first bytes)."""

    NONE = "none"
    TEXT = "text"
    COMPACT = "compact"
    HYBRID = "hybrid"


class Choice(enum.StrEnum):
    """What Save is told to send (``--format``)."""

    AUTO = "auto"
    TEXT = "text"
    COMPACT = "compact"


@dataclass(slots=True)
class Refusal:
    """One line or record that Load will not apply (1-based; 0: the payload as a whole)."""

    line_no: int
    reason: str


@dataclass(slots=True)
class Decoded:
    """The entries of a payload, and what was refused (counted, samples kept)."""

    entries: list[Entry] = field(default_factory=list)
    refused: int = 0
    samples: list[Refusal] = field(default_factory=list)

    def refuse(self, line_no: int, reason: str) -> None:
        """Count a refusal; keep the first :data:`MAX_REFUSAL_SAMPLES` with their reasons."""
        self.refused += 1
        if len(self.samples) < MAX_REFUSAL_SAMPLES:
            self.samples.append(Refusal(line_no, reason))

    def merge(self, other: Decoded) -> None:
        """Count ``other``'s refusals too, as if they had come after these."""
        self.refused += other.refused
        self.samples += other.samples[:max(0, MAX_REFUSAL_SAMPLES - len(self.samples))]
