#!/usr/bin/env bash
# Refresh the README's screenshots (docs/images/*.jpg) from the browser tests that
# take them: the labeling page, the quality page, a PPO job's live curves and a
# policy's samples beside its parent's. Run after a change to those pages.
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF_README_IMAGES=1 bash scripts/test.sh -q -p no:cacheprovider \
  "tests/test_browser_label.py::test_labeler_labels_three_tasks_with_the_keyboard_only" \
  "tests/test_browser_quality.py::test_admin_finds_the_random_labeler_on_the_quality_page" \
  "tests/test_browser_training.py::test_reward_model_then_ppo_then_next_round"
ls -l docs/images
