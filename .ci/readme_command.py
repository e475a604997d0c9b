"""Print the README's Nth command (1 = the main job, 2 = the tests): the Nth line of the
"Set up" section's ```bash blocks, exactly as the README writes it."""

import re
import sys
from pathlib import Path

text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
            for line in block.splitlines() if line.strip()]
print(commands[int(sys.argv[1]) - 1])
