"""Identity score of generated images, as FastComposer and PortraitBooth measure it.

  identity_score  `IdentityScorer`, `ranking`, `format_report`, `match_subjects`, `greedy_match`
"""
