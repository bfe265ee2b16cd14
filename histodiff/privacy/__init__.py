"""Privacy at a site: DP-SGD local steps (opacus), a persistent per-site accountant, the privacy report, and the
memorisation check of the global generator against the site's own tiles (``memorisation``)."""

from histodiff.privacy.accountant import ACCOUNTANT_FILE, PrivacyBudgetExhausted, SiteAccountant

# the memorisation check's largest request: a site refuses more (the check must stay a short message); here, without
# torch, because the launchers check the run config (wire/settings.py) before anything starts
MEMORISATION_MAX_SAMPLES = 4096

__all__ = ["ACCOUNTANT_FILE", "MEMORISATION_MAX_SAMPLES", "PrivacyBudgetExhausted", "SiteAccountant"]
