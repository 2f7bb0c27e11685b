"""RLHF Workbench: human feedback annotation with the InstructGPT loop built in."""
