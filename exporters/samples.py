"""Fixed inputs for validation: varied lengths, punctuation, casing, numbers, one long text."""

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "iPhone 12 128GB",
    "I am really mad because my product broke.",
    "What is the meaning of life?",
    "The meaning of life is 42.",
    "A man is playing a guitar on the stage.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "hello",
    "Offre gratuite, cliquez ici",
    "The patient was admitted with chest pain and shortness of breath.",
    "Can you recommend a good restaurant near the station?",
    "Machine learning models can be compressed with 8-bit quantisation.",
    "It rained all day, so the football match was postponed until Sunday.",
    "Error 404: the requested page could not be found on this server!",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    " ".join(["Long documents are truncated to the model's maximum number of tokens."] * 40),
]
