"""Demonstrations: labelers write the response they want for a prompt; admins
review them; accepted ones are the SFT training data (step 1 of the recipe).

The feature is split like ranking's services:
- leases: which labeler writes for which prompt (a draft is the lease), and the
  only way a labeler reads a demonstration (`labeler_demonstration`);
- writing: saving drafts, submitting, skipping, starting from the model's answer;
- review: the admins' queue, accept / reject / edit, figures per labeler;
- export: accepted demonstrations as training data and as SFT JSONL;
- imports: demonstrations from a JSONL file.
A set's progress is app/services/progress.demonstration_progress; who may
write for a set is app/services/labelers.open_to.

The names below are the feature's interface (`demonstrations.save_draft`, ...).
"""

from app.services.demonstrations.export import (
    EXPORT_FORMATS,
    AcceptedDemonstration,
    accepted_demonstrations,
    export_row,
    iter_export,
)
from app.services.demonstrations.imports import (
    DemonstrationImportResult,
    ParsedDemonstration,
    import_demonstrations,
    store_best_of_n,
    parse_demonstrations,
)
from app.services.demonstrations.leases import (
    current_demonstration,
    labeler_demonstration,
    lease_next_demonstration,
    load_demonstration,
)
from app.services.demonstrations.review import (
    MAX_REASON_CHARS,
    ReviewFigures,
    accept_demonstration,
    acceptance_rates,
    count_waiting,
    demonstration_sets,
    edit_demonstration,
    list_demonstrations,
    reject_demonstration,
    review_queue,
)
from app.services.demonstrations.writing import (
    MAX_TEXT_CHARS,
    SKIP_REASONS,
    SaveResult,
    SubmitResult,
    WriterCounts,
    model_answer,
    recent_rejections,
    save_draft,
    skip_demonstration,
    start_from_model_answer,
    submit_demonstration,
    writer_counts,
)

__all__ = [
    "store_best_of_n",
    "EXPORT_FORMATS", "MAX_REASON_CHARS", "MAX_TEXT_CHARS", "SKIP_REASONS",
    "AcceptedDemonstration", "DemonstrationImportResult", "ParsedDemonstration", "ReviewFigures", "SaveResult",
    "SubmitResult", "WriterCounts",
    "accept_demonstration", "acceptance_rates", "accepted_demonstrations", "count_waiting", "current_demonstration",
    "demonstration_sets", "edit_demonstration", "export_row", "import_demonstrations", "iter_export",
    "labeler_demonstration", "lease_next_demonstration", "list_demonstrations", "load_demonstration",
    "model_answer", "parse_demonstrations", "recent_rejections", "reject_demonstration", "review_queue",
    "save_draft", "skip_demonstration", "start_from_model_answer", "submit_demonstration", "writer_counts",
]
