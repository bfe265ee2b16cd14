"""Privacy at a site: DP-SGD local steps (opacus), a persistent per-site accountant, the privacy report, and the
memorisation check of the global generator against the site's own tiles (``memorisation``)."""

from histodiff.privacy.accountant import ACCOUNTANT_FILE, PrivacyBudgetExhausted, SiteAccountant

__all__ = ["ACCOUNTANT_FILE", "PrivacyBudgetExhausted", "SiteAccountant"]
