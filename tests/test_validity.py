"""What a benchmark measures and whether its truth can arbitrate (attribution.evaluation.validity)."""

from __future__ import annotations

import json

from attribution.evaluation.report import build_report, report_label
from attribution.evaluation.validity import (
    design_label,
    group_rows,
    truth_validity,
    validity_message,
    variant_rows,
)


def _lds(design: str | None, agreement: float | None, sign: float = 1.0) -> dict:
    bench = {"subset_coupled": True} | ({"subset_design": design} if design else {})
    lds = {
        "steps": [0, 5], "bench": bench, "truth_replicates": 2 if agreement is not None else 1,
        "featurize": {"proj_kind": "sjlt", "proj_dim": 64},
        "methods": {"journey": {"label": "journey", "num_draws": 4, "ridge": 0.1, "sign": sign, "mean": [0.2, -0.1],
                                "se": [0.01, 0.02], "overall": 0.05, "overall_se": 0.01}},
    }
    if agreement is not None:
        lds["replicate_agreement"] = {"overall": agreement, "overall_se": 0.01, "mean": [agreement] * 2,
                                      "se": [0.01] * 2, "pairs": 1}
    return lds


def test_validity_message_says_when_the_truth_cannot_arbitrate():
    assert truth_validity(_lds("groups", 0.004)) == 0.004
    assert "means little" in validity_message(_lds("groups", 0.004))
    assert "mostly signal" in validity_message(_lds("dirichlet", 0.7))
    assert "unknown" in validity_message(_lds("dirichlet", None))


def test_old_results_are_the_within_class_design():
    assert design_label(_lds(None, 0.07)) == "within-class"
    assert report_label({"lds": _lds("groups", 0.1)}).startswith("group counterfactuals")


def test_group_rows_apply_the_validation_sign():
    lds = _lds("groups", 0.1, sign=-1.0)
    lds["groups"] = {"methods": {"journey": {"spearman": [-0.2, 0.1], "sign_agreement": [0.3, 0.4]}}}
    (row,) = group_rows(lds)
    assert row["ρ step 0"] == "+0.20" and row["ρ step 5"] == "-0.10"
    assert row["sign agreement (mean)"] == "0.65"  # 1 - mean(0.3, 0.4) once the sign is flipped
    assert group_rows(_lds("dirichlet", 0.1)) == []


def test_report_carries_the_variants_of_the_work_dir(tmp_path):
    (tmp_path / "lds.json").write_text(json.dumps(_lds("dirichlet", 0.6)))
    crn = _lds("dirichlet", 0.6)
    crn["featurize"]["draw_sharing"] = "common"
    crn["methods"]["journey"]["overall"] = 0.2
    (tmp_path / "lds_crn.json").write_text(json.dumps(crn))
    report = build_report(tmp_path)
    rows = variant_rows(report)
    assert [r["variant"] for r in rows] == ["crn"]
    assert rows[0]["mean LDS"].startswith("+0.200") and "common draws" in rows[0]["train features"]
