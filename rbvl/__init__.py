"""rbvl: fine-tune vision-language models with R&B data mixing (Regroup domains, Balance them online)."""

__version__ = "0.1.0"
