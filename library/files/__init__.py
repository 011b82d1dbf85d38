"""File formats shared by the library and the dataset tools: one reader of text files, one reader of
images, one atomic writer. The dataset tools import this package and nothing else from the library."""
