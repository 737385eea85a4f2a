"""NCAP against the official code: torques of `ncap` (swim-only and with the speed / turn units) and of
`ncap_navigator` equal the official SwimmerModule / SwimmerPolicy's on the same weights and inputs. The fixture
was written by running the official module (tests/fixtures/ncap_official/README.md)."""

import json
import math
from pathlib import Path

import pytest
import torch
from biozoo.models import create_model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ncap_official" / "ncap_official.json").read_text())
SIDES = ("d", "v")


def biozoo_state(params: dict[str, list], n_joints: int, sharing: bool) -> dict[str, torch.Tensor]:
    """The official ParameterDict in biozoo's names: shared bneuron_prop -> prop, ...; unshared per-joint
    scalars -> (dorsal, ventral) rows (muscle_d_v_i: ventral B-neuron onto the dorsal muscle = contra row 0)."""
    if sharing:
        rename = {"bneuron_prop": "prop", "bneuron_osc": "osc", "bneuron_speed": "speed", "bneuron_turn": "turn",
                  "muscle_ipsi": "muscle_ipsi", "muscle_contra": "muscle_contra"}
        return {rename[k]: torch.tensor(v) for k, v in params.items()}

    def rows(pattern: str, joints) -> torch.Tensor:
        return torch.tensor([[params[pattern.format(s=s, o=o, i=i)][0] for i in joints]
                             for s, o in zip(SIDES, SIDES[::-1])])

    state = {"prop": rows("bneuron_{s}_prop_{i}", range(1, n_joints)), "osc": rows("bneuron_{s}_osc_{i}", [0]),
             "muscle_ipsi": rows("muscle_{s}_{s}_{i}", range(n_joints)),
             "muscle_contra": rows("muscle_{s}_{o}_{i}", range(n_joints))}
    if "bneuron_d_speed_0" in params:
        state["speed"] = rows("bneuron_{s}_speed_{i}", range(n_joints))
        n_turn = sum(k.startswith("bneuron_d_turn_") for k in params)
        state["turn"] = rows("bneuron_{s}_turn_{i}", range(n_turn))
    return state


def case_id(c: dict) -> str:
    controls = f"turn{c['n_turn_joints']}" if c["controls"] else "swim"
    return f"{c['n_links']}links-{controls}-{'shared' if c['weight_sharing'] else 'unshared'}-" \
           f"{'signed' if c['sign_constraints'] else 'unsigned'}"


@pytest.mark.parametrize("case", FIXTURE["modules"], ids=case_id)
def test_ncap_torques_equal_the_official_swimmer_module(case):
    n = case["n_links"]
    model = create_model("ncap", n_links=n, weight_sharing=case["weight_sharing"],
                         sign_constraints=case["sign_constraints"], turn_control=case["controls"],
                         speed_control=case["controls"], n_turn_joints=case["n_turn_joints"])
    model.load_state_dict(biozoo_state(case["params"], n - 1, case["weight_sharing"]))
    columns = [torch.tensor(case["joint_angles"])]
    if case["controls"]:  # [joint angles, right, left, speed, t / 1000]
        columns += [torch.tensor(case[k])[:, None] for k in ("right", "left", "speed")]
    columns.append(torch.tensor(case["timesteps"])[:, None] / 1000)
    with torch.no_grad():
        torques = model(torch.cat(columns, 1)).logits
    expected = torch.tensor(case["torques"])
    assert expected.abs().max() > 0.1  # the fixture exercises the circuit
    torch.testing.assert_close(torques, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", FIXTURE["policies"], ids=lambda c: f"{c['n_links']}links-{c['task']}")
def test_navigator_torques_equal_the_official_swimmer_policy(case):
    """SwimmerPolicy(use_task=...) reads [joints, to_target, body velocities] at its first step (clock 0)."""
    model = create_model("ncap_navigator", n_links=case["n_links"], task=case["task"])
    state = {f"circuit.{k}": v for k, v in biozoo_state(case["params"], case["n_links"] - 1, True).items()}
    if case["task"] == "learned":
        state |= {"task_module.weight": torch.tensor(case["task_weight"]),
                  "task_module.bias": torch.tensor(case["task_bias"])}
    model.load_state_dict(state)
    obs = torch.tensor(case["observations"])
    with torch.no_grad():
        torques = model(torch.cat([obs, torch.zeros(len(obs), 1)], 1)).logits
    torch.testing.assert_close(torques, torch.tensor(case["torques"]), atol=1e-6, rtol=0)


def test_fixture_covers_the_issue_grid():
    grid = {(c["n_links"], c["n_turn_joints"], c["sign_constraints"], c["weight_sharing"])
            for c in FIXTURE["modules"] if c["controls"]}
    assert grid == {(n, t, s, w) for n in (4, 6, 9) for t in (1, 2) for s in (True, False) for w in (True, False)}
    assert math.isclose(len(FIXTURE["modules"]), 36)
