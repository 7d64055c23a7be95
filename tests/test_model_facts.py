"""A model's facts (what the preflight plans with) are kept by the SHA-256 of its weights once
a run went ahead: a later plan neither loads the model nor imports mace, and stored facts are
only trusted when they are this file's, in this layout, from this matxfer version."""

import json
import subprocess
import sys

from matxfer.model_facts import facts_file, keep_facts, model_facts

FRESH = """
import sys
from matxfer.model_facts import keep_facts, model_facts
facts = model_facts("small", "float32", sys.argv[1])
keep_facts(facts, sys.argv[1])
print(facts.n_params, facts.n_blocks, facts.graph.cutoff, facts.graph.dtype, facts.family,
      len(facts.graph.z_table), any(m == "mace" or m.startswith("mace.") for m in sys.modules))
"""


def fresh_process_facts(folder) -> list[str]:
    out = subprocess.run([sys.executable, "-c", FRESH, str(folder)], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def test_stored_facts_plan_the_model_without_loading_it_or_importing_mace(tmp_path, backbone):
    first = fresh_process_facts(tmp_path)  # loads the model, stores its facts
    again = fresh_process_facts(tmp_path)
    assert first[:-1] == again[:-1] and (first[-1], again[-1]) == ("True", "False")
    n_params = sum(p.numel() for p in backbone.parameters())
    assert again[:6] == [str(n_params), "3", "6.0", "torch.float32", "mace",
                         str(len(backbone.atomic_numbers))]


def test_facts_of_another_file_or_version_are_not_trusted(tmp_path):
    model_facts.cache_clear()
    facts = model_facts("small", "float32", str(tmp_path))
    where = facts_file(str(tmp_path), facts.sha256, "float32")
    assert not where.exists()  # the plan itself writes nothing
    keep_facts(facts, str(tmp_path))
    stored = json.loads(where.read_text())
    for key, wrong in (("sha256", "0" * 64), ("matxfer", "0.0.0-other"), ("format", 0)):
        where.write_text(json.dumps({**stored, key: wrong, "n_params": 1}))
        model_facts.cache_clear()
        assert model_facts("small", "float32", str(tmp_path)).n_params == facts.n_params
    where.write_text("{not json")
    model_facts.cache_clear()
    assert model_facts("small", "float32", str(tmp_path)) == facts
    keep_facts(facts, str(tmp_path))
    assert json.loads(where.read_text()) == stored  # rewritten from the loaded model


def test_a_study_driver_does_not_import_mace_until_it_builds_one():
    code = ("import sys, matxfer.tune, matxfer.cli; "
            "print(sorted(m for m in sys.modules if m == 'mace' or m.startswith('mace.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
