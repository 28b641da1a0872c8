"""Make docs/routing_explorer.png, the picture at the top of the README.

The routing explorer (mixtral_edu/analysis/explorer.py) on the trained tiny model, code beside prose, at the last
layer with one expert highlighted, rendered by headless Chromium (Debian's `chromium` package):

    .venv/bin/python docs/readme_picture.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from mixtral_edu.assets import TINY_MODEL_DIR
from mixtral_edu.weights import load_model
from mixtral_edu.analysis.explorer import write_explorer
from mixtral_edu.analysis.routing import trace_routing
from mixtral_edu.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
CODE = ("class Reader:\n    def read(self, size):\n        if self.closed:\n"
        "            return b''\n        return self.buffer.read(size)\n")
PROSE = ("And the LORD God planted a garden eastward in Eden; "
         "and there he put the man whom he had formed.")


def main() -> int:
    tok = Tokenizer()
    model = load_model(TINY_MODEL_DIR, progress=False)
    ids = [[tok.bos_id] + tok.encode(text) for text in (CODE, PROSE)]
    traces = [trace_routing(model, i) for i in ids]
    token = next(i for i, piece in enumerate(tok.pieces(ids[0])) if piece.lstrip("▁") == "self")   # pin the first `self`
    with tempfile.TemporaryDirectory() as tmp:
        page = write_explorer(Path(tmp) / "explorer.html", traces, [tok.pieces(i) for i in ids],
                              names=["Python code", "King James prose"], model_name="data/tiny-mixtral")
        out = HERE / "routing_explorer.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp}/profile", "--hide-scrollbars", "--window-size=1400,900",
                        "--virtual-time-budget=3000", f"--screenshot={out}", f"file://{page}#layer=3&token={token}&expert=2"],
                       check=True, capture_output=True, timeout=120)
    print(out)
    for name, i, trace in zip(["code", "prose"], ids, traces):     # the numbers the README's caption quotes
        taken = [p for t, p in enumerate(tok.pieces(i)) if 2 in trace.expert_ids[3, t].tolist()]
        print(f"expert 2 at layer 3 takes {len(taken)} of the {len(i)} {name} tokens: {taken}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
