"""What is served: `GET /v1/models`."""

from __future__ import annotations

from fastapi import APIRouter

from api.http.dependencies import ModelDep
from api.problem_codes import MODEL_CARD_PROBLEMS
from api.problems import problem_responses
from api.schemas import ModelInfo, ModelsResponse, TaskInfo
from headct.model_card import ModelCard

router = APIRouter(prefix="/v1", tags=["models"])


def model_info(card: ModelCard) -> ModelInfo:
    return ModelInfo(
        name=card.name,
        version=card.model_version,
        triton_version=card.triton_version,
        sha256=card.checkpoint_sha256,
        synthetic_demo=card.synthetic_demo,
        notice=card.notice,
        tasks=[
            TaskInfo(
                name=t.name,
                threshold=t.threshold,
                heldout_auc=t.heldout_auc,
                backbone_group=t.group,
                pairing=t.pairing,
            )
            for t in card.tasks
        ],
        input=card.input,
        preprocessing_version=card.preprocessing_version,
        embedding_dim=card.embedding_dim,
        max_batch_size=card.max_batch_size,
    )


@router.get(
    "/models",
    summary="The served model, its findings and thresholds, and its input contract",
    responses=problem_responses(*MODEL_CARD_PROBLEMS),
)
async def list_models(model: ModelDep) -> ModelsResponse:
    return ModelsResponse(models=[model_info(await model.card())])
