"""What a 1 MiB payload carries of a typical table, for each kind of destination.

The README's capacity table and the hybrid format's overhead come from here:
for each table size it encodes the same entries (``realistic_lines``, parsed
as Save would have them) in each format, and prints

- the compact section of the hybrid payload (``auto``): its size, and what the
  base64 comment lines cost over the binary compact payload they carry;
- how many entries this helper's Load reads of it (the compact records);
- how many a Perl destination receives: the save lines after the section,
  which ``conntrack --load-file`` creates (``tests/integration/
  test_mixed_cluster.py`` checks that with real conntrack(8) at 6,000);
- how many ``text`` (the Perl helper's format) and ``compact`` send.

Pure computation: no root, bus or kernel.

    python3 -m tests.bench.capacity [N ...]
"""

from __future__ import annotations

import sys

from pvevmstate import payload
from pvevmstate.payload import hybrid, savetext
from tests.support import realistic_lines

MARK = 100
SIZES = (1000, 5000, 6000, 50_000, 80_000, 100_000, 108_000, 120_000)


def row(n: int) -> dict[str, int]:
    # The seed and timeouts of tests/unit/test_hybrid.py's tables.
    entries = [savetext.parse_line(ln) for ln in realistic_lines(n, seed=5, min_timeout=900)]
    auto = payload.encode(entries, MARK)
    binary = len(hybrid.unarmor(auto.data))
    # The comment lines as sent: the header line, then the base64 lines.
    section = sum(len(ln) + 1 for ln in auto.data.split(b"\n") if ln.startswith(b"#"))
    return {"entries": n, "binary": binary, "section": section, "helper": auto.sent, "perl": auto.text_sent,
            "text": payload.encode(entries, MARK, fmt=payload.Choice.TEXT).sent,
            "compact": payload.encode(entries, MARK, fmt=payload.Choice.COMPACT).sent}


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or list(SIZES)
    print("| entries in the table | compact section | base64 overhead | this helper receives "
          "| a Perl destination receives | `text` sends | `compact` sends |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        r = row(n)
        print("| {:,} | {:,} KiB | {:.1f} % | {:,} | {:,} | {:,} | {:,} |".format(
            n, round(r["section"] / 1024), 100 * (r["section"] / r["binary"] - 1), r["helper"], r["perl"],
            r["text"], r["compact"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
