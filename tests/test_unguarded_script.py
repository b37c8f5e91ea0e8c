"""vLLM's quickstart with only the import line changed: `LLM()` and `generate()` at module level,
no `if __name__ == "__main__":` guard, no shutdown call. The engine processes must start once
(they never re-import the script), the script must print its completions and exit 0, and no
engine process may outlive it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

QUICKSTART = textwrap.dedent('''
    import sys
    from engine import LLM, SamplingParams

    prompts = ["Hello, my name is", "The capital of France is"]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8)
    llm = LLM(model=sys.argv[1])
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
''')


def engine_processes() -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"run_child" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(int(pid))
        except OSError:
            pass
    return found


def test_unguarded_quickstart_runs_and_leaves_nothing(tiny_checkpoint, tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(QUICKSTART)
    before = engine_processes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(tiny_checkpoint)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("Prompt: ")]
    assert [line.split(",")[0] for line in lines] == ["Prompt: 'Hello", "Prompt: 'The capital of France is'"]
    assert "Traceback" not in done.stderr and "bootstrapping" not in done.stderr
    assert engine_processes() - before == set(), "engine processes outlived the script"
