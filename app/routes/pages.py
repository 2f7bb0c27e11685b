"""The routers outside the JSON API: the HTML pages and the health probes, each with its
own URL prefix, in the order the app includes them."""

from app.routes import (
    account,
    admin_users,
    auth,
    demonstrations,
    demonstrations_admin,
    evaluations,
    health,
    home,
    jobs,
    label,
    leaderboard,
    models,
    prompt_sets,
    quality,
    review,
    training,
)

routers = [module.router for module in (
    health, auth, home, admin_users, account, prompt_sets, label, quality, review, jobs, demonstrations,
    demonstrations_admin,
)] + [training.sft_router, training.router, models.router, evaluations.router, leaderboard.router]
