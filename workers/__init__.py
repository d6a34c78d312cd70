"""Celery workers that run the core (``ml``) for the service: training and sampling on a ``gpu``
queue. They land with the service issue (#3); the functions they will call are in
``ml.pipeline`` (learn_prototypes, train_model) and ``ml.sample`` (sample_to_folder), with
``ml.train.Progress`` callbacks for job progress and ``TrainingCancelled`` for cancellation.
"""
